"""chipcheck: prove every accelerator and link of a training fleet computes the right bits at the right speed."""

__version__ = "0.1.0"
