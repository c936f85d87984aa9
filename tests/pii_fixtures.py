"""Labelled text for the PII detector: real-looking personal data in English and Chinese that must be found, and
look-alikes (versions, dates, ISBNs, order ids, private addresses, hashes) that must not.

Each case is (text, [(kind, exact substring), ...]). Card numbers are the networks' published test numbers; IBANs
are the registries' examples; secrets are vendors' documented example shapes, none live.
"""

from __future__ import annotations

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\nZ1BjP5CE8Wm5c1M=\n-----END RSA PRIVATE KEY-----"

PII_CASES: list[tuple[str, list[tuple[str, str]]]] = [
    # --- English
    ("You can reach me at john.doe@example.com if the invoice is wrong.", [("email", "john.doe@example.com")]),
    ("Send it to Maria.Garcia+billing@mail.acme-corp.co.uk, she handles refunds.",
     [("email", "Maria.Garcia+billing@mail.acme-corp.co.uk")]),
    ("My number is (415) 555-2671, call after 6pm.", [("phone", "(415) 555-2671")]),
    ("Call our London office on +44 20 7946 0958 or 020 7946 0958.",
     [("phone", "+44 20 7946 0958"), ("phone", "020 7946 0958")]),
    ("Text me: +1 212-555-0187.", [("phone", "+1 212-555-0187")]),
    ("Reach the Berlin desk at +49 30 901820.", [("phone", "+49 30 901820")]),
    ("My card is 4111 1111 1111 1111, expiry 12/27, CVV 123.", [("credit_card", "4111 1111 1111 1111")]),
    ("Charge 5555555555554444 please.", [("credit_card", "5555555555554444")]),
    ("Amex 3782 822463 10005 was declined.", [("credit_card", "3782 822463 10005")]),
    ("Use 6011-1111-1111-1117 for the deposit.", [("credit_card", "6011-1111-1111-1117")]),
    ("Wire it to DE89 3704 0044 0532 0130 00 by Friday.", [("iban", "DE89 3704 0044 0532 0130 00")]),
    ("IBAN: GB82WEST12345698765432", [("iban", "GB82WEST12345698765432")]),
    ("Pay FR1420041010050500013M02606 AND keep the receipt.", [("iban", "FR1420041010050500013M02606")]),
    ("My home IP is 83.12.174.201 and the VPN exits at 2001:4860:4860::8888.",
     [("ip_address", "83.12.174.201"), ("ip_address", "2001:4860:4860::8888")]),
    ("The logs show a login from 91.198.174.192 at 03:12.", [("ip_address", "91.198.174.192")]),
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", [("secret", "AKIAIOSFODNN7EXAMPLE")]),
    ("export GITHUB_TOKEN=ghp_1a2B3c4D5e6F7g8H9i0JkLmNoPqRsTuVwXyZ", [("secret", "ghp_1a2B3c4D5e6F7g8H9i0JkLmNoPqRsTuVwXyZ")]),
    ("OPENAI_API_KEY=sk-proj-Abc123Def456Ghi789Jkl012Mno345Pqr678Stu",
     [("secret", "sk-proj-Abc123Def456Ghi789Jkl012Mno345Pqr678Stu")]),
    ("token: xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
     [("secret", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx")]),
    (f"Authorization: Bearer {JWT}", [("secret", JWT)]),
    (f"Here is my key, please fix the login:\n{PEM}\nthanks", [("secret", PEM)]),
    ("key=AIzaSyD-1234567890abcdefghijklmnopqrstu and hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
     [("secret", "AIzaSyD-1234567890abcdefghijklmnopqrstu"), ("secret", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567")]),
    ("Contact jane@corp.io or +1 (646) 555-0143; card 4012 8888 8888 1881.",
     [("email", "jane@corp.io"), ("phone", "+1 (646) 555-0143"), ("credit_card", "4012 8888 8888 1881")]),
    # --- Chinese
    ("我的手机号是13812345678，有事请联系。", [("phone", "13812345678")]),
    ("客服电话：+86 138 1234 5678（工作日）", [("phone", "+86 138 1234 5678")]),
    ("北京办公室座机 010-6552 9988，传真同号。", [("phone", "010-6552 9988")]),
    ("张伟的邮箱是 zhangwei@qq.com，请抄送给他。", [("email", "zhangwei@qq.com")]),
    ("请把合同发到li.na@company.com.cn，谢谢", [("email", "li.na@company.com.cn")]),
    ("我的银行卡号 6200 0000 0000 0005 被冻结了。", [("credit_card", "6200 0000 0000 0005")]),
    ("信用卡号：4111111111111111，有效期12/27", [("credit_card", "4111111111111111")]),
    ("服务器公网地址是121.40.23.156，端口22。", [("ip_address", "121.40.23.156")]),
    ("汇款账户 IBAN：NL91ABNA0417164300，收款人王芳。", [("iban", "NL91ABNA0417164300")]),
    ("这是我的密钥 AKIAI44QH8DHBEXAMPLE 别外传", [("secret", "AKIAI44QH8DHBEXAMPLE")]),
    ("联系人：刘洋，电话 139-1087-6543，邮箱 liuyang@163.com",
     [("phone", "139-1087-6543"), ("email", "liuyang@163.com")]),
]

LOOK_ALIKES: list[str] = [
    # versions and software
    "Upgrade to version 1.2.3.4 before Friday.", "Windows build v10.0.19041.1 fixed it.", "Python 3.11.4 and numpy==1.26.4",
    "Chrome 120.0.6099.109 crashed.", "版本 2.10.4.1 修复了这个问题。", "pip install torch==2.4.0+cu121",
    # dates and times
    "The release is on 2023-10-12 at 12:30:45.", "Meeting 10:30-11:45 on 12/05/2023.", "2023年10月12日下午3点",
    "Timestamp 1696118400 and 1696118400000 in ms.", "Q3 2023 revenue: 1,234,567,890 USD.",
    # ISBNs and product / order identifiers
    "ISBN 978-3-16-148410-0 is on the shelf.", "ISBN-13: 9780306406157, ISBN 0-306-40615-2",
    "Your order #20231012001 has shipped.", "Order ID: 4155552671", "订单号：20231012345678，请查收。",
    "Tracking number 1Z999AA10123456784.", "Invoice INV-2023-000123 is overdue.", "SKU 4006381333931 (EAN-13)",
    "Ref: 4539148803436467", "编号 13812345678 的包裹已签收",
    # numbers in maths and science
    "pi is 3.14159265358979 and e is 2.71828182845904.", "the result after the decimal place: 275.43397884615385",
    "What is the result of 9778474 / 743?", "1387 * i = 223905 - 1858", "= 5336352000 + 1482320 + 148232 = 5337834320",
    "Thus, the result of 512088 × 137872 is 7105356608.", "The population is 1400000000 people.",
    "Coordinates: 39.9042, 116.4074", "x = [1, 2, 3, 4, 5, 6, 7, 8]", "1234 5678 9012 3456 is not a card.",
    # addresses that are not personal
    "Set the gateway to 192.168.1.1 and the DNS to 10.0.0.1.", "Bind to 127.0.0.1:8080 or 0.0.0.0.",
    "The docs use 203.0.113.5 and 2001:db8::1 as examples.", "Connect to localhost:5432 or ::1.",
    # code and hashes
    "@property\ndef name(self): return self._name", "result = a @ b", "ssh git@localhost", "std::vector<int> v;",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "commit 76e41c8 and 4f2a9b1",
    "uuid 123e4567-e89b-12d3-a456-426614174000", "MAC 00:1A:2B:3C:4D:5E", "Use scikit-learn, not sk-learn.",
    "The string eyJhbGciOi is truncated.", "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqh\n-----END PUBLIC KEY-----",
    "Base64: QUtJQUlPU0ZPRE5ON0VYQU1QTEU=", "CSS color #4111111 and rgba(0,0,0,0.5)",
    # capital-letter words that start like IBANs
    "DE12 is a room number; GB20 and FR33 are codes.", "US10 PLAN A1B2 C3D4 E5F6 is a product key",
]
