"""The driver's environment credentials for a store, captured into ``storage_options`` by
:meth:`~batchmask.batch.storage.StorageSpec.resolved` (Ray workers, possibly on other machines,
do not share the driver's environment).

Apart from :mod:`.storage` because it reads only the environment and a dict of options, never a
store.
"""

from __future__ import annotations

import os
from typing import Any


def _resolve_s3(opts: dict[str, Any]) -> None:
    env = os.environ
    if not any(k in opts for k in ("key", "secret", "token", "profile", "anon")):
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            opts["key"], opts["secret"] = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
            if env.get("AWS_SESSION_TOKEN"):
                opts["token"] = env["AWS_SESSION_TOKEN"]
        elif env.get("AWS_PROFILE"):
            opts["profile"] = env["AWS_PROFILE"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        ck = dict(opts.get("client_kwargs") or {})
        ck.setdefault("region_name", region)
        opts["client_kwargs"] = ck


_AZURE_ENV = {"connection_string": "AZURE_STORAGE_CONNECTION_STRING", "account_name": "AZURE_STORAGE_ACCOUNT_NAME",
              "account_key": "AZURE_STORAGE_ACCOUNT_KEY", "sas_token": "AZURE_STORAGE_SAS_TOKEN"}


def _resolve_azure(opts: dict[str, Any]) -> None:
    if any(k in opts for k in (*_AZURE_ENV, "credential", "anon", "client_secret")):
        return
    for opt, var in _AZURE_ENV.items():
        if os.environ.get(var):
            opts[opt] = os.environ[var]
