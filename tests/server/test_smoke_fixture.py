async def test_banner_and_quit(start_sink, connect):
    server = await start_sink()
    client = await connect(server.addresses[0])
    reply = await client.cmd("EHLO me")
    assert reply.code == 250 and "PIPELINING" in reply.lines
    assert (await client.cmd("QUIT")).code == 221
    await client.expect_closed()
