"""Training: the datasets models learn from, and the scripts that train them."""
