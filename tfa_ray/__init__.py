"""tfa-ray: industrial visual anomaly detection with TFA-Net, at archive scale on Ray."""

__version__ = "0.1.0"
