"""The bottom floor: Ray start/join and the Ray Data context, object storage and this node's cache, whole-file I/O."""
