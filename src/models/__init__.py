"""Models: the frozen ViT (vit.py, timm_backbone.py), its checkpoints, VQT (vqt.py) and inference."""
