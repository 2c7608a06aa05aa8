"""WebSocket peers for the proxy tests (Debian's python3-websockets, a real implementation).

  serve <port>                                   echo server (run inside the guest's network)
  echo <proxy-host> <proxy-port> <url> <count>   client: connects to the proxy, sends <count>
                                                 messages of varied sizes, checks every echo;
                                                 prints "ok <count>" or fails
"""
import asyncio
import hashlib
import sys

import websockets


async def serve(port):
    async def echo(ws, _path=None):
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, "0.0.0.0", port, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


async def client(host, port, url, count):
    async with websockets.connect(url, host=host, port=port, max_size=None) as ws:
        for i in range(count):
            size = (i * 37) % 4096
            body = hashlib.sha256(str(i).encode()).digest() * (size // 32 + 1)
            message = body[:size] if i % 2 else body[:size].hex()
            await ws.send(message)
            back = await ws.recv()
            if back != message:
                raise SystemExit(f"message {i}: echo differs")
    print(f"ok {count}", flush=True)


if sys.argv[1] == "serve":
    asyncio.run(serve(int(sys.argv[2])))
else:
    asyncio.run(client(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
