"""Models. Importing this package first makes `import timm` work next to CPU-only torch (see
`src.utils.torchvision_shim`): every module here may then import timm."""
from src.utils.torchvision_shim import allow_torchvision_import

allow_torchvision_import()
