"""Datasets as in-memory uint8 tensors, batched and augmented as whole-tensor operations."""

from scn.data.cifar10 import cifar10
from scn.data.core import Augment, ImageData, batches
from scn.data.fashion_mnist import fashion_mnist
from scn.data.image_folder import image_folder
from scn.data.synthetic import synthetic

__all__ = ["Augment", "ImageData", "batches", "cifar10", "fashion_mnist", "image_folder", "synthetic"]
