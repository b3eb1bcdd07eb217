"""Files: images in and out, atomic (staged) writes, output locks, FreeSurfer colour tables."""
