"""arlab: a lab for autoregressive image generation research.

Components (tokenizers, orders, Token-Shuffle windows, backbones, conditioners, samplers, data)
register by kind and name in :mod:`arlab.registry`; experiments compose YAML presets with
:mod:`arlab.config`; the ``arlab`` command (:mod:`arlab.cli`) lists, validates, packs data and
trains.
"""

__version__ = "0.1.0"
