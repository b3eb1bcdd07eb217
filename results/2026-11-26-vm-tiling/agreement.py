"""Agreement of a tiled segmentation with the untiled one (results/2026-11-26-vm-tiling/summary.md).

Usage: agreement.py UNTILED_SEG TILED_SEG [UNTILED_VOL_CSV TILED_VOL_CSV]
Prints identical labels over all voxels and over voxels non-zero in either run, the mean and least Dice over the
untiled run's structures, and (with the CSVs) the largest volume difference and the total intracranial change.
"""

import csv
import sys

import nibabel as nib
import numpy as np

a = np.asanyarray(nib.load(sys.argv[1]).dataobj)
b = np.asanyarray(nib.load(sys.argv[2]).dataobj)
brain = (a > 0) | (b > 0)
dice = [2 * np.sum((a == x) & (b == x)) / (np.sum(a == x) + np.sum(b == x)) for x in np.unique(a) if x != 0]
print(f"agreement all {np.mean(a == b):.3f} brain {np.mean(a[brain] == b[brain]):.3f} "
      f"dice mean {np.mean(dice):.2f} min {np.min(dice):.2f}")
if len(sys.argv) > 4:
    with open(sys.argv[3]) as fa, open(sys.argv[4]) as fb:
        ra, rb = list(csv.reader(fa)), list(csv.reader(fb))
    names, va, vb = ra[0][1:], np.array(ra[1][1:], float), np.array(rb[1][1:], float)
    k = int(np.argmax(np.abs(va - vb)))
    print(f"largest volume diff {abs(va[k] - vb[k]) / 1000:.1f} cm3 ({names[k]}); "
          f"total intracranial {100 * (vb[0] - va[0]) / va[0]:+.1f} %")
