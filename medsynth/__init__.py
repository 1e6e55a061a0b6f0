"""medsynth: diffusion models for synthesising medical images, as Lightning stages wired by a CLI."""

__version__ = "0.1.0"
