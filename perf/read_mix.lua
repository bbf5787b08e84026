-- The read mix for wrk, run by perf/wrk.py: every request is drawn at random from a plan
-- file written by the benchmark (perf/wrk.py's write_plan: one line per drawn request,
-- already in the mix's proportions: "route<TAB>path<TAB>key", key "-" for none), so the
-- weights, tenants and ids live in Python and this script only replays them. Requests are
-- formatted once in init() so that wrk spends its CPU on the sockets, not on Lua.
--
-- Usage: wrk -t2 -c100 -d20s -s perf/read_mix.lua http://127.0.0.1:PORT -- PLAN_FILE
--
-- done() prints one line "READ_BENCH_RESULT {json}" with the totals, wrk's error counts
-- (status: answers with a status of 400 or more) and latency percentiles in microseconds.

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
  table.insert(threads, thread)
end

local plan = {}

function init(args)
  local file = args[1]
  if file == nil then
    error("read_mix.lua needs the plan file after --")
  end
  for line in io.lines(file) do
    local _, path, key = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)$")
    if path ~= nil then
      local headers = {}
      if key ~= "-" then
        headers["Authorization"] = "Bearer " .. key
      end
      plan[#plan + 1] = wrk.format("GET", path, headers)
    end
  end
  if #plan == 0 then
    error("read_mix.lua: no requests in " .. file)
  end
  -- Each thread draws its own sequence.
  math.randomseed(7919 * thread_id + 17)
end

function request()
  return plan[math.random(#plan)]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'READ_BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, '
      .. '"status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, '
      .. '"p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean
  ))
end
