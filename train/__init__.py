"""Training: the scripts that train the models (`python -m train.NAME`, on accelerate)."""
