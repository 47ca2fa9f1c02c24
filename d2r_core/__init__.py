"""The shared kernel of d2r: what every package needs, and nothing else.

- :mod:`d2r_core.errors`: the root of the exception tree (:class:`D2RError`) and
  :class:`ConfigError`;
- :mod:`d2r_core.config`: parsers of ``D2R_*`` settings, the config file, TLS file settings;
- :mod:`d2r_core.settings_spec`: :class:`~d2r_core.settings_spec.Setting`, a setting declared
  once (name, default, parser, documentation), and the masking of secrets in shown values;
- :mod:`d2r_core.statuses`: DIMSE status names;
- :mod:`d2r_core.tcp`: socket options of the DICOM connections;
- :mod:`d2r_core.classes`: the 22 VinDr-CXR classes and the 14 CheXpert observations;
- :mod:`d2r_core.geometry`: :data:`Box` and :func:`iou`.

It imports nothing first-party (an import-linter contract says so), so any package may use it
without depending on the DICOM receiver, the model or the worker.
"""
