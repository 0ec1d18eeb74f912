"""Provisioning and mTLS: a project's root CA, startup kits, and site identity taken from certificates.

    provision.py   `fl-plugins provision PROJECT.yaml -o kits/`: the CA, the aggregator's kit, one kit per site
                   (needs `cryptography`: pip install 'fl-plugins[server]')
    ca.py          the project's root CA, the certificates it issues and its record of them (for provision.py)
    tls.py         reading a kit into gRPC credentials, the aggregator's check of who is calling, and a kit-less
                   site's refusal of plaintext to another machine
    revocation.py  the server kit's list of revoked certificates (`provision --revoke`), re-read when it changes
    policy.py      a site's policy.yaml: the jobs and task types it agrees to run

Nothing here is imported by `import fl_plugins`. tls.py, revocation.py and policy.py need only grpc, pyyaml and the
standard library; `cryptography` is needed to provision and, on the aggregator, to check a non-empty revocation list.
"""
