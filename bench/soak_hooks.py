"""The faults bench/soak.py injects from inside a hospital's own processes.

`SITECUSTOMIZE` is written as `sitecustomize.py` into a folder on that hospital's PYTHONPATH, so
every Python process of its SuperNode (the SuperNode and each ClientApp it starts) loads it. Each
fault waits for a trigger file the soak writes when the fault is due, fires once, and renames
the trigger to `<trigger>.fired`: the library's own code path runs, only its input or its
message is made bad.

- ENOSPC (`FEDWARD_SOAK_ENOSPC`): the next fsync of the hospital's ledger's temporary file fails
  with `OSError(ENOSPC)` (the trigger's content: how many ledger fsyncs to let pass first; 1
  skips the reservation and hits the confirmation after training).
- A replayed message (`FEDWARD_SOAK_REPLAY`): the hospital's reply to the SecAgg+ share-keys
  stage is its reply to that stage from its last earlier round, sent again as it was (each
  share-keys reply is kept in `FEDWARD_SOAK_REPLIES` for this).
- A truncated message (`FEDWARD_SOAK_TRUNCATE`): the hospital's masked update is cut to half
  its bytes before it is sent.

Both message faults happen at the sender, as a broken or dishonest node would send them; a replay
by someone on the network is stopped before fedward by TLS and node authentication.
"""

SITECUSTOMIZE = r'''
import errno
import importlib.util
import os
import pickle
import sys

_fsync = os.fsync


def _fire(trigger):
    os.replace(trigger, trigger + ".fired")


def _soak_fsync(fd):
    trigger = os.environ.get("FEDWARD_SOAK_ENOSPC")
    if trigger and os.path.exists(trigger):
        try:
            target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            target = ""
        prefix = "." + os.environ.get("FEDWARD_SOAK_LEDGER", "") + ".json."
        if target.startswith(prefix) and target.endswith(".tmp"):
            with open(trigger) as handle:
                skip = int(handle.read().strip() or 0)
            if skip > 0:
                with open(trigger, "w") as handle:
                    handle.write(str(skip - 1))
            else:
                _fire(trigger)
                raise OSError(errno.ENOSPC, "No space left on device (injected by bench/soak.py)")
    return _fsync(fd)


os.fsync = _soak_fsync


def _share_keys_reply(reply):
    kept = os.path.join(os.environ["FEDWARD_SOAK_REPLIES"], "share_keys.pkl")
    trigger = os.environ.get("FEDWARD_SOAK_REPLAY", "")
    sent = reply
    if os.path.exists(trigger) and os.path.exists(kept):
        with open(kept, "rb") as handle:
            earlier = pickle.load(handle)
        if earlier.get("round") != reply.get("round"):
            _fire(trigger)
            sent = earlier
    with open(kept + ".tmp", "wb") as handle:
        pickle.dump(reply, handle)
    os.replace(kept + ".tmp", kept)
    return sent


def _masked_update_reply(reply):
    trigger = os.environ.get("FEDWARD_SOAK_TRUNCATE", "")
    if not os.path.exists(trigger):
        return reply
    _fire(trigger)
    packed = reply["masked_update"]
    return {**reply, "masked_update": packed[: packed.size // 2]}


def _patch(module):
    session = module.SecAggClientSession
    stages = (("share_keys", _share_keys_reply), ("masked_update", _masked_update_reply))
    for stage, tamper in stages:
        original = getattr(session, stage)

        def sent(self, *args, _original=original, _tamper=tamper, **kwargs):
            return _tamper(_original(self, *args, **kwargs))

        setattr(session, stage, sent)


class _PatchOnImport:
    """Patches the client's SecAgg+ session as it is first imported (not before: the SuperNode
    itself never imports it)."""

    name = "fedward.client.secagg.session"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("FEDWARD_SOAK_REPLIES"):
    sys.meta_path.insert(0, _PatchOnImport())
'''
