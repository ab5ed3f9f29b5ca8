"""The load generator's compiled engines (Cython): the throughput scenario's
hot loop (pubsub_engine), the ingest clients (ingest_engine), the TLS clients
on OpenSSL (tls_clients), the latency histograms they record into
(latency_hist.pxd) and the I/O steps both engines take alike (engine_io.pxd). They cimport the server's codec and I/O declarations
(gw_ext/codec.pxd, gw_ext/netio.pxd, gw_ext/openssl.pxd)."""
