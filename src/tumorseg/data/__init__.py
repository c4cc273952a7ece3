"""Data: the kaggle_3m layout, its cache, patient splits and PyTorch datasets."""

from tumorseg.data.cache import Cache, open_cache, open_data, prepare
from tumorseg.data.dataset import LGGDataset, SliceArrays, load_arrays, normalize
from tumorseg.data.kaggle import find_patient_dirs, list_slices, read_image, read_mask, read_patient
from tumorseg.data.splits import Split, load_split, make_split, save_split

__all__ = [
    "Cache", "LGGDataset", "SliceArrays", "Split", "find_patient_dirs", "list_slices",
    "load_arrays", "load_split", "make_split", "normalize", "open_cache", "open_data",
    "prepare", "read_image", "read_mask", "read_patient", "save_split",
]
