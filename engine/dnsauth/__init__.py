"""DNS authentication checks for sending domains: SPF, DKIM, DMARC, bounce MX, reverse DNS.

``lookup`` (the resolver the checks share: the ``[routing]`` nameservers, answers kept per
run), ``spf`` (an RFC 7208 evaluator: does this address pass this domain's SPF), ``check``
(the report for each configured sending domain and source address, as data: ``engine dns
check`` prints it, the dashboard can show it). No command-line code in here.
"""
