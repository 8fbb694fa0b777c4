"""A Dify-style code node against sandboxd-http (the dify-sandbox API): the program Dify
builds around a node's `main`, posted as Dify posts it.

    python3 docs/examples/code_node.py http://127.0.0.1:8194 API_KEY
"""

import base64
import json
import re
import sys
import urllib.request

USER_CODE = '''
def main(a: int, b: int) -> dict:
    return {"sum": a + b}
'''
inputs = base64.b64encode(json.dumps({"a": 40, "b": 2}).encode()).decode()
program = (f"{USER_CODE}\nimport json, base64\n"
           f"inputs_obj = json.loads(base64.b64decode('{inputs}').decode('utf-8'))\n"
           "output_obj = main(**inputs_obj)\n"
           "print(f'<<RESULT>>{json.dumps(output_obj)}<<RESULT>>')\n")
body = json.dumps({"language": "python3", "code": program, "preload": "", "enable_network": False}).encode()
url, key = sys.argv[1], sys.argv[2]
request = urllib.request.Request(f"{url}/v1/sandbox/run", body,
                                 {"X-Api-Key": key, "Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as response:
    data = json.load(response)["data"]
if data["error"]:
    sys.exit(f"the node failed: {data['error']}")
print(json.loads(re.search(r"<<RESULT>>(.*)<<RESULT>>", data["stdout"], re.S).group(1)))
