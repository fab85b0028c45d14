"""segadapt: adapt self-supervised 3D segmentation foundation models (MedSeqFT, ASSFT) reproducibly."""

__version__ = "0.1.0"
