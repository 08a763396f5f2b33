# The second half of docker/Dockerfile, on a root filesystem scripts/docker-image.sh made from
# the built workspace and this machine's libraries and imported as BASE (no registry needed).
ARG BASE
FROM ${BASE}

# --- from here on identical to docker/Dockerfile ---
# The runtime directory containers mount read-only, and the engine the daemon watches
# (without the socket mounted it logs why, retries with back-off, and `freeflow container add`
# still works). HOST_IP_PREFIX and VNET_PREFIX come from `docker run -e`; FREEFLOW_REGISTRY
# names a registry several hosts share (default: one in the container's state directory).
ENV FREEFLOW_DIR=/freeflow FREEFLOW_DOCKER=/var/run/docker.sock
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/freeflow", "status"]
ENTRYPOINT ["/usr/local/bin/freeflow", "up", "--foreground"]
