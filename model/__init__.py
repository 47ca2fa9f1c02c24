"""D2R-Net: lesion detection and report generation for chest radiographs.

Heavy modules (torch) are imported only by the submodules that need them:
import :mod:`model.predict`, :mod:`model.modeling` or :mod:`model.checkpoint`
explicitly.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
