"""The data layer: GTSRB layouts, download, the synthetic generator, the tensor cache and the batch loader."""
