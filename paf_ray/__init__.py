"""paf_ray: pretrain -> adapt -> finetune for multi-task driving perception on BDD100K, on Ray."""

__version__ = "0.1.0"


def load(checkpoint, device="cpu"):
    """Load a trained checkpoint as a predictor with ``predict(image) -> dict`` (see paf_ray.predict)."""
    from paf_ray.predict import load_predictor

    return load_predictor(checkpoint, device=device)
