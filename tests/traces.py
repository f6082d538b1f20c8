"""Policies and events shared by the worker tests (the seed-004 flow rule and its trace)."""

FLOW = '''
raise "Must not call tool after user uses keyword" if:
    (msg: Message) -> (tool: ToolCall)
    msg.role == "user"
    "send" in msg.content
    tool is tool:send_email
'''

USER_SEND = {"role": "user", "content": "Can you send this email to Peter?"}
SEND_EMAIL = {"id": "1", "type": "function",
              "function": {"name": "send_email", "arguments": {"contents": "Hi Peter"}}}
BENIGN = {"role": "assistant", "content": "Sure, here is the weather."}
