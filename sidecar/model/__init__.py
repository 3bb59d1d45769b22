"""Model layer: loading, tokenization and the engines that run forward passes."""
