import sys

from paf_ray.cli import main

sys.exit(main())
