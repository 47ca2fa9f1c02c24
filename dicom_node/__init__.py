"""The DICOM node: receive (``scp``), persist (``spool``, ``studies``), select and send (``scu``).

Submodules are imported explicitly (``from dicom_node.scp import build_ae``); this
package module stays light so that importing one part never loads the others.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
