"""Data for calibration and evaluation: the shared data folder, fixed TinyStories slices, STS
files (:mod:`.datasets`) and tokenizers (:mod:`.tokenizers`)."""
