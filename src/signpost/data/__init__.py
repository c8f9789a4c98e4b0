"""The data layer: GTSRB layouts, download and extraction, the synthetic generator and its sign art, image
decoding, the tensor cache and its hash index, and the batch loader."""
