"""A scan's live images written into its HDF5 file, in the layout stempy's `stempy.io.save_stem_images` writes:

  stem/images           float64 (images, scan rows, scan cols): the geometry's virtual images, in electrons
                        (counted data) or summed pixel values (raw frames); NaN where no frame arrived.
                        attrs names = ["bright_field", "annular_dark_field_0", ...] (as save_stem_images),
                        inner_radii, outer_radii, centre (x, y) in pixels: the geometry they were made with.
                        Note: stempy's own create_stem_images on counted data sums its mask value 0xFFFF per
                        electron, so its images are 65535 x these (stempy/image.h, calculateSTEMValuesSparse).
and beside it (detstream's own; stempy ignores them):
  stem/com              float64 (2, scan rows, scan cols): centre of mass, [0] = x (column), [1] = y (row), in
                        pixels, as stempy.image.com_sparse(..., replace_nans=False) orders it
  stem/idpc             float64 (scan rows, scan cols): iDPC phase (radians, up to a constant)
  stem/sum_pattern      float64 (frame rows, frame cols): summed diffraction pattern; for raw frames, attr
                        frames = how many frames it and max_pattern hold (the written ones, less any whose
                        worker's pattern never came or that a re-send processed twice: see results/feed.py)
  stem/max_pattern      float64 (frame rows, frame cols): maximum diffraction pattern
  stem/position_status  uint8 (scan rows, scan cols): COMPLETE, PARTIAL or MISSING, the codes of
                        accounting/position_status; mask the images with `position_status == COMPLETE`
"""

from __future__ import annotations

import h5py
import numpy as np

from detstream.services.results.images import MISSING, PENDING, ScanImages

__all__ = ["write_stem_images"]


def write_stem_images(h5: h5py.File, scan: ScanImages) -> None:
    """Write `scan`'s images into the open, writable file `h5` (layout above). Positions still pending count as
    MISSING. Raises FileExistsError if the file already has `stem/` (a user's results are never overwritten)."""
    if "stem" in h5:
        raise FileExistsError(f"{h5.filename}: already has stem/ images; not overwritten")
    stem = h5.create_group("stem")
    geometry = scan.geometry
    images = stem.create_dataset("images", data=np.stack([scan.array(name) for name in geometry.names]))
    images.attrs["names"] = geometry.names
    images.attrs["inner_radii"] = [inner for inner, _ in geometry.radii]
    images.attrs["outer_radii"] = [outer for _, outer in geometry.radii]
    images.attrs["centre"] = scan.centre
    stem.create_dataset("com", data=np.stack([scan.array("com_x"), scan.array("com_y")]))
    stem.create_dataset("idpc", data=scan.array("idpc"))
    pattern = stem.create_dataset("sum_pattern", data=scan.array("sum"))
    if scan.kind == "frames":
        pattern.attrs["frames"] = scan.pattern_frames
    stem.create_dataset("max_pattern", data=scan.array("max"))
    status = scan.array("status")
    status[status == PENDING] = MISSING
    stem.create_dataset("position_status", data=status)
