-- dicom-ai-node auto-routing, loaded by orthanc.json ("LuaScripts").
--
-- Orthanc forwards to the node (the modality "AINODE" of orthanc.json) what
-- the node can process, once it has stopped arriving (StableAge):
--
--   series rule (OnStableSeries): chest radiographs, Modality CR or DX, body
--     part CHEST/THORAX/LUNG or none -> pneumonia pipeline. RSNA-style files
--     are Secondary Capture with Modality CR, so the rule looks at Modality,
--     not at the SOP Class.
--   study rule (OnStableStudy): the MR series of a study -> brain tumour
--     pipeline, which needs several series (T1, T1c, T2, FLAIR) together.
--
-- These rules mirror the [[routes]] of config/node.toml; change both
-- together. The node matches again, exactly, and keeps what no rule wants
-- only for a while; this script just keeps obvious non-candidates and the
-- node's own results off the wire. Every decision is logged, one line per
-- series or MR study ("Lua says: ainode: ..." in Orthanc's log).

local NODE = 'AINODE'

local CHEST_MODALITIES = { CR = true, DX = true }
local CHEST_BODY_PARTS = { [''] = true, CHEST = true, THORAX = true, LUNG = true }

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

function OnStableSeries(seriesId, tags, metadata)
  local modality = Upper(tags['Modality'])
  local what = 'ainode: series ' .. seriesId .. ' (' .. modality .. ', body part "' .. (tags['BodyPartExamined'] or '') .. '")'
  if IsDerived(tags) then
    print(what .. ' is a derived object, not sent')
  elseif CHEST_MODALITIES[modality] and CHEST_BODY_PARTS[Upper(tags['BodyPartExamined'])] then
    print(what .. ' -> ' .. NODE)
    SendInstances(ParseJson(RestApiGet('/series/' .. seriesId))['Instances'])
  elseif modality == 'MR' then
    print(what .. ' goes with its study')
  else
    print(what .. ' is nothing for the node, not sent')
  end
end

-- A study turns stable again whenever something is added to it, our results
-- included. The study metadata "AinodeForwarded" remembers which MR series
-- and how many instances were sent, so the same study is sent only once
-- (and again only if new MR images arrive).
function OnStableStudy(studyId, tags, metadata)
  local toSend = {}
  local instances = 0
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local seriesTags = series['MainDicomTags']
    if Upper(seriesTags['Modality']) == 'MR' and not IsDerived(seriesTags) then
      table.insert(toSend, series['Instances'])
      instances = instances + #series['Instances']
    end
  end
  if #toSend == 0 then
    return
  end
  local signature = #toSend .. ' series, ' .. instances .. ' instances'
  local what = 'ainode: study ' .. studyId .. ' (MR, ' .. signature .. ')'
  if metadata['AinodeForwarded'] == signature then
    print(what .. ' was sent already, not sent again')
    return
  end
  print(what .. ' -> ' .. NODE)
  for _, seriesInstances in ipairs(toSend) do
    SendInstances(seriesInstances)
  end
  RestApiPut('/studies/' .. studyId .. '/metadata/AinodeForwarded', signature)
end
