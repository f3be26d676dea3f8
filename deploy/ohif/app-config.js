/** @type {AppTypes.Config} */
// OHIF (npm @ohif/app 3.13) configuration for reviewing dicom-ai-node results
// in Orthanc. deploy/ohif/viewer.py serves it as /app-config.js, in place of
// the dist's own, and proxies /dicom-web to Orthanc's DICOMweb plugin on the
// same origin: no CORS, and no host name in this file.
window.config = {
  name: 'dicom-ai-node',
  routerBasename: null, // the dist uses absolute paths: served at /
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false, // same origin
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (dicom-ai-node)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/dicom-web',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        // Orthanc's metadata gives pixel data (and large values) as
        // BulkDataURIs; OHIF fetches them through the same proxy.
        bulkDataURI: {
          enabled: true,
          relativeResolution: 'studies',
        },
      },
    },
  ],
};
