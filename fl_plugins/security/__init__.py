"""Provisioning and mTLS: a project's root CA, startup kits, and site identity taken from certificates.

    provision.py   `fl-plugins provision PROJECT.yaml -o kits/`: the CA, the aggregator's kit, one kit per site
                   (needs `cryptography`: pip install 'fl-plugins[server]')
    tls.py         reading a kit into gRPC credentials, and the aggregator's check of who is calling

Nothing here is imported by `import fl_plugins`; the aggregator and the client import tls.py only when given a kit.
"""
