"""The Ir of Guard.process's pieces outside bench.core's stages, one loop over N events between two
os.getppid() calls each (valgrind --tool=callgrind --dump-before=getppid; segment i is dump 2i)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from prof import setup

from bench import core
from byzguard import engine
from byzguard.clocks import lamport_mark_key
from byzguard.envelope import Envelope, decode
from byzguard.guard import ENTITIES, LAMPORTS, Result, Routed, _Tx
from byzguard.state import EntityState, decode_lamport, encode_lamport


def seg(name: str, fn: Callable[[], object]) -> None:
    fn()
    os.getppid()
    fn()
    os.getppid()
    print("SEG", name, flush=True)


def main() -> None:
    guard, route, state, todo = setup(core.CASES[sys.argv[1]], int(sys.argv[2]))
    envs: list[Envelope] = []
    for r in todo:
        env = decode(r.key, r.value, r.headers, default_type=route.default_type)
        assert isinstance(env, Envelope)
        envs.append(env)
    keys = [e.subject.encode() for e in envs]
    lks = [lamport_mark_key(e.source, e.instance) for e in envs]
    ents = [EntityState.from_bytes(state[ENTITIES].get(k)) for k in keys]
    marks = [decode_lamport(state[LAMPORTS].get(k)) for k in lks]
    policy = route.policy_for(envs[0].type)
    kr, lim, now = guard.config.keyring, guard.limits, core.NOW
    seg("process", lambda: [guard.process(r, route, state, now=now) for r in todo])
    seg("Result+_Tx", lambda: [_Tx(state, Result()) for r in todo])
    seg("get entities", lambda: [state[ENTITIES].get(k) for k in keys])
    seg("get lamports", lambda: [state[LAMPORTS].get(k) for k in lks])
    seg("keys+policy_for", lambda: [(e.subject.encode(), route.policy_for(e.type),
                                     lamport_mark_key(e.source, e.instance)) for e in envs])
    seg("env.data", lambda: [e.data() for e in envs])
    seg("env.data again", lambda: [e.data() for e in envs])
    decs = [engine.verify(e, policy, x, m, kr, now=now, limits=lim, received=r.timestamp)
            for e, x, m, r in zip(envs, ents, marks, todo, strict=True)]
    seg("verify", lambda: [engine.verify(e, policy, x, m, kr, now=now, limits=lim, received=r.timestamp)
                           for e, x, m, r in zip(envs, ents, marks, todo, strict=True)])
    seg("to_bytes+encode_lamport", lambda: [(d.entity.to_bytes() if d.entity else b"",
                                             encode_lamport(d.lamport or 0)) for d in decs])
    seg("_emit", lambda: [guard._emit(_Tx(state, Result()), r, route, d, e, now)
                          for r, d, e in zip(todo, decs, envs, strict=True)])
    seg("Routed", lambda: [Routed(r, d, e, None, None) for r, d, e in zip(todo, decs, envs, strict=True)])
    seg("empty loop", lambda: [None for r in todo])


if __name__ == "__main__":
    main()
