-- dicom-ai-node auto-routing, loaded by orthanc.json ("LuaScripts").
--
-- Orthanc forwards to the node what the node can process, once it has
-- stopped arriving (StableAge). The rules are not in this script: they are
-- the "AinodeRouting" section of the Orthanc configuration, which
-- `ainode orthanc-routing --config node.toml` writes from the node's
-- [[routes]] (paste it into orthanc.json, or save it as a file of its own in
-- Orthanc's configuration folder). A new pipeline and its route never need
-- an edit here.
--
--   "Series" rules (OnStableSeries): a stable series whose main DICOM tags
--     match a rule is sent. RSNA-style files are Secondary Capture with
--     Modality CR, so rules look at Modality, not at the SOP Class.
--   "Study" rules (OnStableStudy): the series of a stable study that match
--     a rule are sent together (a study-level pipeline, e.g. the brain
--     tumour one, needs several series: T1, T1c, T2, FLAIR).
--
-- A rule's "Match" maps a tag to its accepted values (upper case; "" accepts
-- an absent or empty tag); every tag must match, any value of a multi-valued
-- tag may. The node matches again, exactly (regular expressions, ranges and
-- other attributes are left to it), and keeps what no route wants only for a
-- while; this script just keeps obvious non-candidates and the node's own
-- results off the wire. Every decision is logged, one line per series or
-- study ("Lua says: ainode: ..." in Orthanc's log).

local ROUTING = GetOrthancConfiguration()['AinodeRouting']
if ROUTING == nil then
  print('ainode: no "AinodeRouting" section in the Orthanc configuration; nothing is forwarded '
        .. '(write one with `ainode orthanc-routing`)')
  ROUTING = {}
end
local NODE = ROUTING['Modality'] or 'AINODE'
local SERIES_RULES = ROUTING['Series'] or {}
local STUDY_RULES = ROUTING['Study'] or {}

-- The node's results (and other derived objects) are never sent to it: that
-- would be a loop, and the node has no use for them. Ours are SEG and SR
-- with Manufacturer exactly "dicom-ai-node" and "NOT FOR DIAGNOSTIC USE" in
-- the Series Description; any one of these marks is enough. (Studies made by
-- `ainode tools nifti-to-dicom` say "dicom-ai-node nifti-to-dicom": they are
-- test input for the node, and are sent.)
local DERIVED_MODALITIES = { SEG = true, SR = true, PR = true, KO = true, RTSTRUCT = true }

local function Upper(value)
  return string.upper(value or '')
end

-- Lua's SendToModality takes instances, not series (Orthanc 1.10: a series
-- id fails with "Unable to read attachment"). The sends are queued as one
-- Orthanc job, which sends them on one association.
local function SendInstances(instanceIds)
  for _, id in ipairs(instanceIds) do
    SendToModality(id, NODE)
  end
end

local function IsDerived(tags)
  return DERIVED_MODALITIES[Upper(tags['Modality'])]
    or tags['Manufacturer'] == 'dicom-ai-node'
    or string.find(Upper(tags['SeriesDescription']), 'NOT FOR DIAGNOSTIC USE', 1, true) ~= nil
end

-- Whether the tag's value (any of its backslash-separated values) is accepted.
local function TagMatches(value, accepted)
  local values = {}
  for v in string.gmatch((value or '') .. '\\', '([^\\]*)\\') do
    table.insert(values, Upper(v))
  end
  for _, wanted in ipairs(accepted) do
    for _, v in ipairs(values) do
      if v == Upper(wanted) then
        return true
      end
    end
  end
  return false
end

-- The name of the first rule whose every tag matches, or nil.
local function MatchingRoute(rules, tags)
  for _, rule in ipairs(rules) do
    local all = true
    for keyword, accepted in pairs(rule['Match'] or {}) do
      if not TagMatches(tags[keyword], accepted) then
        all = false
        break
      end
    end
    if all then
      return rule['Route'] or '?'
    end
  end
  return nil
end

function OnStableSeries(seriesId, tags, metadata)
  local modality = Upper(tags['Modality'])
  local what = 'ainode: series ' .. seriesId .. ' (' .. modality .. ', body part "' .. (tags['BodyPartExamined'] or '') .. '")'
  if IsDerived(tags) then
    print(what .. ' is a derived object, not sent')
    return
  end
  local route = MatchingRoute(SERIES_RULES, tags)
  if route ~= nil then
    print(what .. ' -> ' .. NODE .. ' (route ' .. route .. ')')
    SendInstances(ParseJson(RestApiGet('/series/' .. seriesId))['Instances'])
  elseif MatchingRoute(STUDY_RULES, tags) ~= nil then
    print(what .. ' goes with its study')
  else
    print(what .. ' is nothing for the node, not sent')
  end
end

-- A study turns stable again whenever something is added to it, our results
-- included. The study metadata "AinodeForwarded" remembers which series and
-- how many instances were sent, so the same study is sent only once (and
-- again only if new matching images arrive).
function OnStableStudy(studyId, tags, metadata)
  local toSend = {}
  local instances = 0
  local modalities = {}
  local routes = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local seriesTags = series['MainDicomTags']
    local route = not IsDerived(seriesTags) and MatchingRoute(STUDY_RULES, seriesTags)
    if route then
      table.insert(toSend, series['Instances'])
      instances = instances + #series['Instances']
      modalities[Upper(seriesTags['Modality'])] = true
      routes[route] = true
    end
  end
  if #toSend == 0 then
    return
  end
  local function Keys(set)
    local out = {}
    for k, _ in pairs(set) do
      table.insert(out, k)
    end
    table.sort(out)
    return table.concat(out, '/')
  end
  local signature = #toSend .. ' series, ' .. instances .. ' instances'
  local what = 'ainode: study ' .. studyId .. ' (' .. Keys(modalities) .. ', ' .. signature .. ')'
  if metadata['AinodeForwarded'] == signature then
    print(what .. ' was sent already, not sent again')
    return
  end
  print(what .. ' -> ' .. NODE .. ' (route ' .. Keys(routes) .. ')')
  for _, seriesInstances in ipairs(toSend) do
    SendInstances(seriesInstances)
  end
  RestApiPut('/studies/' .. studyId .. '/metadata/AinodeForwarded', signature)
end
