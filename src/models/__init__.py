"""Models: the frozen ViT (vit.py, timm_backbone.py), its checkpoints, VQT and the exported model."""
