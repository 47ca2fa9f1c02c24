"""What a node's settings leave open: the warnings ``d2r node`` and ``d2r serve`` log at start.

Each is one line, logged once by the node process (its listener processes do not repeat them):

* the DICOM listener, bound off loopback, accepts any calling AE title from any address
  (``D2R_ALLOWED_CALLING_AETS`` and ``D2R_ALLOWED_NETWORKS`` unset);
* DICOM TLS is on without verified client certificates (``D2R_TLS_CA`` unset or
  ``D2R_TLS_REQUIRE_CLIENT_CERT=false``);
* the HTTP endpoint listens off loopback without HTTPS (``D2R_HTTP_TLS_CERT`` unset);
* ``D2R_HTTP_TLS_CA`` is set: every certificate that CA signs holds the ``ingest`` role.

>>> from dicom_node.settings import NodeSettings
>>> from observability.settings import ObservabilitySettings
>>> exposure_warnings(NodeSettings(host="127.0.0.1"), ObservabilitySettings())
()
>>> len(exposure_warnings(NodeSettings(), ObservabilitySettings(http_host="0.0.0.0")))
2
"""

from __future__ import annotations

from d2r_http.auth import is_loopback
from dicom_node.settings import NodeSettings
from observability.settings import ObservabilitySettings

__all__ = ["exposure_warnings", "http_warnings"]


def _listener(node: NodeSettings) -> list[str]:
    found = []
    where = f"{node.host}:{node.port}"
    if not is_loopback(node.host) and not node.allowed_calling_aets and not node.allowed_networks:
        found.append(
            f"DICOM listener on {where} accepts any calling AE title from any address; "
            "set D2R_ALLOWED_CALLING_AETS and D2R_ALLOWED_NETWORKS to the modalities and PACS "
            "that send"
        )
    tls = node.tls
    if tls.listener_enabled and tls.ca is None:
        found.append(
            f"DICOM TLS on {where} does not check client certificates (D2R_TLS_CA unset): any "
            "client may associate; set D2R_TLS_CA and D2R_TLS_REQUIRE_CLIENT_CERT=true"
        )
    elif tls.listener_enabled and not tls.require_client_cert:
        found.append(
            f"DICOM TLS on {where} accepts clients without a certificate "
            "(D2R_TLS_REQUIRE_CLIENT_CERT=false); set it to true to require one signed by "
            "D2R_TLS_CA"
        )
    return found


def http_warnings(obs: ObservabilitySettings) -> list[str]:
    """The warnings about the HTTP endpoint alone (``d2r worker`` serves one too)."""
    if obs.http_port == 0:
        return []
    found = []
    where = f"{obs.http_host}:{obs.http_port}"
    if not is_loopback(obs.http_host) and obs.http_tls_cert is None:
        found.append(
            f"HTTP endpoint on {where} is off loopback without HTTPS: tokens, passwords and the "
            "status page travel in cleartext; set D2R_HTTP_TLS_CERT and D2R_HTTP_TLS_KEY, or "
            "terminate TLS in a proxy and set D2R_HTTP_HOST=127.0.0.1"
        )
    if obs.http_tls_ca is not None:
        found.append(
            f"D2R_HTTP_TLS_CA ({obs.http_tls_ca}): every client certificate this CA signs holds "
            f"the ingest role on {where} and may store images (STOW-RS)"
        )
    return found


def exposure_warnings(node: NodeSettings, obs: ObservabilitySettings) -> tuple[str, ...]:
    """The start-up warnings of a node with these settings, one line each (none: nothing open)."""
    return (*_listener(node), *http_warnings(obs))
