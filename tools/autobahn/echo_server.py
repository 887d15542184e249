"""An independent echo origin for scripts/autobahn: Python `websockets` (permessage-deflate
on, as by default), on 127.0.0.1 and a port of the system's choosing, which it prints."""
import os

# Autobahn 9.3/9.4 send 4 MiB messages in 64-byte fragments, 9.1/9.2 16 MiB ones.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 20))
import asyncio
from websockets.asyncio.server import serve


async def echo(ws):
    try:
        async for msg in ws:
            await ws.send(msg)
    except Exception:
        pass


async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=2**25, max_queue=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"echo on 127.0.0.1:{port}", flush=True)
        await server.serve_forever()


asyncio.run(main())
