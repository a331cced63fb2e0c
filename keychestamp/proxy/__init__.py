"""
The listening side of the proxy: TLS sniffing, CONNECT, tunnels, interception
and HTTP/1.1 on the decrypted stream.
"""
