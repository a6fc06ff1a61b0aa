"""Byte layouts of the symmetric regions the normal-mode kernels use, and the size hints
derived from them (Config.get_nvl_buffer_size_hint / get_rdma_buffer_size_hint).

Below the ops and the facade (config.py, buffer.py import it; it imports only the build
side's layout facts and limits), so a size hint never reaches up into an operation family.
intranode: the NVLink region of a one-node Buffer; internode: the RDMA and NVLink regions of
a Buffer spanning nodes.
"""
