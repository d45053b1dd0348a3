-- wrk script: cycle through pre-signed unique events (one "signature<TAB>body" line each) and POST them.
-- Usage: wrk -t THREADS -s load.lua URL -- DATAFILE THREADS
-- Requests are formatted once in init(), so wrk spends nothing per request but the send. Thread k of n
-- takes lines k, k+n, ... so no event is sent twice unless the file runs out (then "wrapped" > 0).
-- done() prints one JSON line that tests/bench reads.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("index", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local path = wrk.path
  local total = tonumber(args[2]) or 1
  requests_ = {}
  local line_no = 0
  for line in io.lines(args[1]) do
    if line_no % total == index then
      local tab = line:find("\t", 1, true)
      local sig, body = line:sub(1, tab - 1), line:sub(tab + 1)
      requests_[#requests_ + 1] = wrk.format("POST", path,
        { ["Content-Type"] = "application/json", ["Stripe-Signature"] = sig }, body)
    end
    line_no = line_no + 1
  end
  next_ = 1
  wrapped = 0
end

function request()
  local r = requests_[next_]
  next_ = next_ + 1
  if next_ > #requests_ then
    next_ = 1
    wrapped = wrapped + 1
  end
  return r
end

function done(summary, latency, requests)
  local wrapped_total = 0
  for _, t in ipairs(threads) do
    wrapped_total = wrapped_total + (tonumber(t:get("wrapped")) or 0)
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "wrapped": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, wrapped_total))
end
