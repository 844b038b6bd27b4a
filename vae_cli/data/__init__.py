"""Datasets as whole uint8 tensors (see base.ImageData); one plain function per dataset,
selected by configs/dataset/<name>.yaml through its `_target_`.

Dataset modules are not imported here so that `import vae_cli.data` stays cheap and does not
pull in torchvision's dataset code for the default procedural dataset.
"""

from vae_cli.data.base import ImageData, binarize_once, check_images

__all__ = ["ImageData", "binarize_once", "check_images"]
