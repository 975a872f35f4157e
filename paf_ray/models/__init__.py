"""The multi-task model: backbones (a registry) + checkpoint zoo, adapters (a registry), LV-Adapter,
FPN neck, the tasks' heads, the stage policy. ``multitask.build_model`` assembles it from a config."""
