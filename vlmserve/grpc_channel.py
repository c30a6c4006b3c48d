"""Options of every gRPC channel we open to a tritonserver (the proxy's to the LLM host, the LLM host's to
its ViT servers)."""

from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

# tritonclient's own channel options, plus reconnection attempts at most a second apart: with gRPC's default
# backoff (growing to 2 minutes) a server that had been down for 20 s was seen ready again 10-13 s late.
_KEEPALIVE = KeepAliveOptions()
CHANNEL_ARGS = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", _KEEPALIVE.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", _KEEPALIVE.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", _KEEPALIVE.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", _KEEPALIVE.http2_max_pings_without_data),
                ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 1000)]
