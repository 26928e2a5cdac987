"""LightningDataModules: generated toys, the embedded digits, and loaders of standard dataset files."""
