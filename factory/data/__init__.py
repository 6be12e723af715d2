"""Reading CT-RATE-layout datasets (real CT-RATE or the phantom) and preprocessing them."""
