"""Data: slice files, the kaggle_3m layout, its cache, normalisation, patient splits,
in-memory slice arrays, sampling and transforms."""

from tumorseg.data.cache import Cache, open_cache, open_data, prepare
from tumorseg.data.dataset import LGGDataset, SliceArrays, load_arrays
from tumorseg.data.kaggle import find_patient_dirs, list_slices, read_patient
from tumorseg.data.normalization import normalize, volume_percentiles
from tumorseg.data.slices import read_image, read_mask
from tumorseg.data.splits import Split, load_split, make_split, save_split

__all__ = [
    "Cache", "LGGDataset", "SliceArrays", "Split", "find_patient_dirs", "list_slices",
    "load_arrays", "load_split", "make_split", "normalize", "open_cache", "open_data",
    "prepare", "read_image", "read_mask", "read_patient", "save_split", "volume_percentiles",
]
