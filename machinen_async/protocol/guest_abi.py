"""What host and guest agree on besides the frames: the port, the image's files, the addresses.

Stdlib only: it is copied into every image beside the guest agent (as is ``wire``).
"""

from __future__ import annotations

# The virtio-serial port the agent serves (QEMU: virtserialport name=...).
AGENT_PORT_NAME = "org.machinen.agent"
# A provisioned image's workload: what to run (written by provision()) and where its output goes.
IMAGE_CONFIG = "/etc/machinen/image.json"
WORKLOAD_LOG = "/var/log/machinen/workload.log"
# QEMU user-mode networking: the guest, its gateway (the host, whose loopback it reaches), DNS.
GUEST_IP, GATEWAY_IP, DNS_IP = "10.0.2.15", "10.0.2.2", "10.0.2.3"
