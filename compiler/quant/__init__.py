"""The quantization core: calibration statistics (:mod:`.stats`), grouped round-to-nearest with ORT's
packing (:mod:`.rtn`), GPTQ and clip search (:mod:`.gptq`), and 8-bit arithmetic (:mod:`.int8`)."""
