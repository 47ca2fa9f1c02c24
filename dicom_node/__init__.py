"""The DICOM node's inbound side: receive (``scp`` for C-STORE, ``stow`` for STOW-RS), persist
(``spool``), read headers (``metadata``, ``instance_file``), choose images (``selection``) and
assemble studies (``assembler``: completion timers, the reconciler). What it records goes to the
study database (:mod:`studydb`); results leave through :mod:`delivery`, never from here.

Submodules are imported explicitly (``from dicom_node.scp import build_ae``); this
package module stays light so that importing one part never loads the others.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
